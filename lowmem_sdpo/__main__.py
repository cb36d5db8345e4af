"""`python -m lowmem_sdpo ...` runs the same CLI as the `lowmem-sdpo` script."""

import sys

if __name__ == "__main__":
    try:
        from lowmem_sdpo.cli import entry
    except KeyboardInterrupt:  # Ctrl-C in the first milliseconds: the same one line as at any later moment
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    entry()
