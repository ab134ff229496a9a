"""``python -m cloudgpu``: the same as the ``cloudgpu`` command."""

from cloudgpu.cli import main

if __name__ == "__main__":
    main()
