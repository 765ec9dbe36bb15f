import sys

from .cli import main

if __name__ == "__main__":  # vLLM's engine process re-imports the main module under spawn
    sys.exit(main())
