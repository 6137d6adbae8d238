import sys

from kc.cli import main

sys.exit(main())
