import sys

from adv.cli import main

sys.exit(main())
