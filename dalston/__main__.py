from dalston.cli import main

raise SystemExit(main())
