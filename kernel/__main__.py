"""``python -m cloudgpu.kernel -f CONNECTION_FILE --hardware SPEC``: what a kernelspec starts."""

from __future__ import annotations

from .launch import main

if __name__ == "__main__":
    main()
