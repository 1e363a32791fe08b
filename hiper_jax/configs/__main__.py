"""``python -m hiper_jax.configs NAME`` prints config NAME's file path (no NAME: the names)."""

import sys

from hiper_jax.configs import names, path

if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit("usage: python -m hiper_jax.configs [NAME]")
    try:
        print(path(sys.argv[1]) if len(sys.argv) == 2 else "\n".join(names()))
    except ValueError as error:
        sys.exit(f"error: {error}")
