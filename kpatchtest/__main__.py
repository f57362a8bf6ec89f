import sys

from kpatchtest.cli import main

sys.exit(main())
