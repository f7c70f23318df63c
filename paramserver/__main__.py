"""python -m paramserver ...  (the same as the `paramserver` command)"""

from .cli import main

raise SystemExit(main())
