"""The Cloud GPU proxy kernel (a whole notebook session on remote hardware).

Not built yet: see the "Cloud GPU kernel" issue. Use ``%%remote`` cells meanwhile.
"""

from __future__ import annotations

__all__: list[str] = []
