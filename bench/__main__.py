import sys

from bench.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports it as __mp_main__
    sys.exit(main())
