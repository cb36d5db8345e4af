"""`python -m lowmem_sdpo ...` runs the same CLI as the `lowmem-sdpo` script."""

from lowmem_sdpo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
