"""The four stages of the loop (sample, label, feedback, train), each a plain function over record files."""
