import sys

from zds.cli import main

sys.exit(main())
