"""python -m switchd"""

from switchd.cli import main

raise SystemExit(main())
