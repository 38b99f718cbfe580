"""``python -m monoscope …`` is the ``monoscope`` command."""
import sys

from monoscope.cli import main

sys.exit(main())
