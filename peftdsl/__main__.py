from peftdsl.cli import main

raise SystemExit(main())
