from icldaemon.cli import main

raise SystemExit(main())
