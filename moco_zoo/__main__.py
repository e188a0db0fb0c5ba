import sys

from moco_zoo.cli import main

sys.exit(main())
