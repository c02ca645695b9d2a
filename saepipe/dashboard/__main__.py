"""``python -m saepipe.dashboard``: build, serve, screenshot, or make synthetic data.

python -m saepipe.dashboard build data/analyze data/dashboard
python -m saepipe.dashboard serve data/dashboard [--port 8000]
python -m saepipe.dashboard screenshot data/dashboard shots/ [--feature 123]
python -m saepipe.dashboard synthetic tmp/analyze [--features 9216]
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m saepipe.dashboard", description=__doc__.splitlines()[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the static site for an analysis folder")
    b.add_argument("analysis_dir")
    b.add_argument("out_dir")
    b.add_argument("--block-size", type=int, default=64)
    s = sub.add_parser("serve", help="serve a built site on 127.0.0.1 until interrupted")
    s.add_argument("site_dir")
    s.add_argument("--port", type=int, default=0)
    sh = sub.add_parser(
        "screenshot", help="PNG screenshots of the index and one feature page (headless Chromium)"
    )
    sh.add_argument("site_dir")
    sh.add_argument("out_dir")
    sh.add_argument(
        "--feature",
        type=int,
        default=None,
        help="default: the alive feature with the largest max activation",
    )
    sh.add_argument("--width", type=int, default=1280)
    sy = sub.add_parser(
        "synthetic", help="write a synthetic analysis folder (the data contract) for development"
    )
    sy.add_argument("out_dir")
    sy.add_argument("--features", type=int, default=9216)
    sy.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.cmd == "build":
        # each command loads only what it uses
        from saepipe.dashboard.site import build_site

        info = build_site(args.analysis_dir, args.out_dir, block_size=args.block_size)
        print(
            f"dashboard: {info.n_features} features, {info.n_blocks} data files, "
            f"{info.bytes_written / 1e6:.1f} MB in {info.seconds:.1f} s -> {info.index}"
        )
    elif args.cmd == "serve":
        # each command loads only what it uses
        from saepipe.dashboard.serve import serve

        with serve(args.site_dir, args.port) as srv:
            print(f"serving {args.site_dir} at {srv.url} (Ctrl-C stops)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    elif args.cmd == "screenshot":
        # each command loads only what it uses
        from saepipe.dashboard.screenshots import take_screenshots

        for path in take_screenshots(
            args.site_dir, args.out_dir, feature=args.feature, width=args.width
        ):
            print(path)
    elif args.cmd == "synthetic":
        # each command loads only what it uses
        from saepipe.dashboard.synthetic import write_synthetic_analysis

        print(write_synthetic_analysis(args.out_dir, n_features=args.features, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
