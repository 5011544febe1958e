from __future__ import annotations

import sys

from disagg.http.server import main

sys.exit(main())
