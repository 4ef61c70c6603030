"""``python -m abawfeat`` (and ``torchrun -m abawfeat``) runs the CLI."""

from abawfeat.cli import main

if __name__ == "__main__":
    main()
