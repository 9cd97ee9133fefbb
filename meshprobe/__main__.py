from meshprobe.cli import main

raise SystemExit(main())
