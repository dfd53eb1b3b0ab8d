"""``python -m ddref.table --readme``: the README's results block from results/table.md."""

from ddref.table.readme import main

raise SystemExit(main())
