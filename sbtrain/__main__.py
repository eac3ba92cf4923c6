"""`python -m sbtrain ...` is the same as the `sbtrain` command (and what torchrun runs)."""

from cli.main import main

if __name__ == "__main__":
    main()
