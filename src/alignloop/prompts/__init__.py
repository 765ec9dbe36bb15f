"""Prompt sets shipped with alignloop (see `alignloop.prompts.builtin`)."""
