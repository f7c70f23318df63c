"""python -m paramserver.benchmarks [options]  (the same as `paramserver bench`)"""

from paramserver.cli import main

raise SystemExit(main(["bench", *__import__("sys").argv[1:]]))
