"""`python -m duet_export.cli`: the console script without its installed wrapper."""

from duet_export.cli import main

main()
