"""Write LAKD into a checkout of upstream mdistiller as one commit on a new branch:
``python tools/upstream.py --mdistiller PATH [--branch lakd] [--patch OUT.patch] [--describe PR.md]
[--dry-run] [--force]`` (docs/UPSTREAM.md).
"""
from __future__ import annotations

import argparse
import sys

from mdistiller_lakd.upstream.pull_request import make, plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--mdistiller", required=True, metavar="PATH", help="a clean git checkout of upstream mdistiller")
    parser.add_argument("--branch", default="lakd", help="the branch to create from its HEAD (default: lakd)")
    parser.add_argument("--patch", metavar="OUT.patch", help="also write the commit as `git format-patch` output")
    parser.add_argument("--describe", metavar="PR.md", help="also write the pull request's description")
    parser.add_argument("--dry-run", action="store_true", help="list the files and edits; change nothing")
    parser.add_argument("--force", action="store_true", help="replace an existing branch of that name")
    args = parser.parse_args(argv)
    try:
        pull_request = plan(args.mdistiller, args.branch, args.force)
        print(pull_request.summary())
        if args.dry_run:
            print("dry run: nothing written")
            return 0
        commit = make(pull_request, args.branch, args.patch, args.describe)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.mdistiller}: branch {args.branch} at {commit[:12]} (checked out); "
          f"{len(pull_request.files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
