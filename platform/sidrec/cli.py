"""The `sidrec` command: thin wrappers over the library, one subcommand per stage.

    sidrec sids build --config ml-100k data.path=../shared/data/ml-100k store.root=artifacts
    sidrec sids report --config ml-100k
    sidrec train --config tiny-cpu train.epochs=1
    sidrec eval --config tiny-cpu eval.split=test
    sidrec report --config tiny-cpu          # rebuild the evaluation's report.html from the store
    sidrec pipeline --config ml-100k
    sidrec items add --config quickstart new_items.jsonl   # also: items update FILE, items retire FILE
    sidrec quickstart
"""

from __future__ import annotations

import argparse
import sys

from sidrec import console
from sidrec.config import ConfigError, SidrecConfig, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show Ray's and the workers' own output")
    p.add_argument("--config", "-c", default=None,
                   help="YAML config file, or the name of a shipped config (ml-100k, amazon-industrial)")
    p.add_argument("overrides", nargs="*", metavar="section.option=value",
                   help="dotted overrides, e.g. embed.batch_size=32 quantize.levels=4")


def _print_sids_report(cfg) -> None:
    from sidrec.sids.report import format_report
    from sidrec.store import ArtifactStore

    store = ArtifactStore(cfg.store.root)
    path = store.current_path("sids")
    print(format_report(store.read_json(f"{path}/report.json")))
    print(f"SIDs: {path}/sids.parquet (version {store.require('sids')['version']})")


def _sids_build(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from sidrec.pipeline import run

    run(cfg, until="sids", force=args.force)
    _print_sids_report(cfg)
    return 0


def _sids_report(args: argparse.Namespace) -> int:
    _print_sids_report(load_config(args.config, args.overrides))
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from sidrec.pipeline import run
    from sidrec.store import ArtifactStore

    manifests = run(cfg, until="model", force=args.force)
    store = ArtifactStore(cfg.store.root)
    print(f"model: {store.current_path('model')} (version {manifests['model']['version']})")
    for row in store.read_json(f"{store.current_path('model')}/metrics.json")["history"]:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                               if not isinstance(v, (list, dict))))
    return 0


def _eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from sidrec.pipeline import eval_report, run

    run(cfg, force={"eval"} if args.force else False)
    _print_report(cfg, eval_report(cfg))
    return 0


def _print_report(cfg: SidrecConfig, report: dict) -> None:
    from sidrec.eval.report import format_cold_start, format_personalization, format_table
    from sidrec.eval.report_store import html_report_path

    print(f"{report['name']} {report['split']}: {report['examples']} examples, full ranking over "
          f"{report['catalog_items']} items; trained on {report['training_data']}")
    print(format_table(report))
    if cold := format_cold_start(report):  # "" for a run without eval.cold_start
        print(cold)
    if report.get("unconstrained_invalid_share") is not None:
        print(f"unconstrained beam search: {report['unconstrained_invalid_share']:.1%} of top-10 outputs "
              f"are not real items ({report['unconstrained_examples']} examples)")
    if pers := format_personalization(report):
        print(pers)
    print(f"run report: {html_report_path(cfg.store.root, cfg.eval.split)}")


def _report(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from sidrec.eval.report_store import rebuild_html_report

    print(rebuild_html_report(cfg.store.root, args.split or cfg.eval.split))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from sidrec.pipeline import eval_report, run
    from sidrec.serve.demo import serve_demo

    run(cfg, force=args.force)
    _print_report(cfg, eval_report(cfg))
    if args.serve or args.keep_serving:
        serve_demo(cfg, port=args.port, keep_serving=args.keep_serving)
    return 0


def _items(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from sidrec.catalog.batch import apply_file
    from sidrec.catalog.files import CatalogFileError
    from sidrec.catalog.writer import CatalogError

    try:
        result = apply_file(cfg.store.root, args.items_command, args.file)
    except (CatalogFileError, CatalogError) as e:
        print(f"sidrec: error: {e} (nothing was written)", file=sys.stderr)
        return 2
    for i in result.items:
        print(f"{i.action:9s} {i.item_id}\t{i.sid}{'' if i.exact else ' (nearest free codes)'}\t{i.title}")
    for i in result.retired:
        print(f"retired   {i}")
    counts = {a: sum(i.action == a for i in result.items) for a in ("added", "updated", "unchanged")}
    done = ", ".join(f"{n} {a}" for a, n in counts.items() if n) or f"{len(result.retired)} retired"
    print(f"{done}; catalog version {result.version} in {cfg.store.root} (Serve replicas apply it within "
          "catalog_poll_s)")
    return 0


def _add_items_parser(sub) -> None:
    items = sub.add_parser("items", help="add, update or retire catalog items through the store's catalog log "
                                         "(what the Serve admin API writes; every replica applies it)")
    items_sub = items.add_subparsers(dest="items_command", required=True, metavar="SUBCOMMAND")
    for name, text, file_help in (
        ("add", "add new items (an id already present with the same text is unchanged)",
         "JSONL or CSV: item_id, title, brand?, categories?, description?"),
        ("update", "new text for present items: new embedding, new SID unless it quantizes to the same",
         "JSONL or CSV, as for add; every id must be present"),
        ("retire", "retire items: never recommended again by any replica",
         "ids: JSONL (item_id), CSV (item_id column) or text, one per line"),
    ):
        p = items_sub.add_parser(name, help=text)
        p.add_argument("file", metavar="FILE", help=file_help)
        _add_config_args(p)
        p.set_defaults(func=_items)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidrec", description="Generative recommendation with Semantic IDs on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's, Ray Data's and the workers' own output (kept in Ray's logs otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sids = sub.add_parser("sids", help="build and inspect item Semantic IDs")
    sids_sub = sids.add_subparsers(dest="sids_command", required=True, metavar="SUBCOMMAND")
    b = sids_sub.add_parser("build", help="dataset → embeddings → quantizer → SIDs + report, in the artifact store")
    _add_config_args(b)
    b.add_argument("--force", action="store_true", help="rebuild stages even if their inputs are unchanged")
    b.set_defaults(func=_sids_build)
    r = sids_sub.add_parser("report", help="print the report of the published SIDs")
    _add_config_args(r)
    r.set_defaults(func=_sids_report)

    t = sub.add_parser("train", help="build SIDs if needed, then fine-tune the SID-extended LLM with Ray Train")
    _add_config_args(t)
    t.add_argument("--force", action="store_true", help="rebuild stages even if their inputs are unchanged")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="train if needed, then HR/NDCG@1/5/10 of the SID-LLM vs most-popular and "
                                    "SASRec on the same split (report in the store)")
    _add_config_args(e)
    e.add_argument("--force", action="store_true", help="re-evaluate even if model and data are unchanged")
    e.set_defaults(func=_eval)

    rep = sub.add_parser("report", help="rebuild the self-contained HTML run report of the published evaluation "
                                        "from the store (nothing is rerun) and print its path")
    _add_config_args(rep)
    rep.add_argument("--split", choices=("valid", "test"), default=None,
                     help="which evaluation (default: the config's eval.split)")
    rep.set_defaults(func=_report)

    _add_items_parser(sub)

    for name, default, text in (
        ("pipeline", None, "every stage (SIDs, training, evaluation), each resumed from the store"),
        ("quickstart", "quickstart", "the pipeline on ml-100k with the tiny CPU model, then a Serve app answering "
                                     "a real test user"),
    ):
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.set_defaults(config=default)
        p.add_argument("--force", action="store_true", help="rebuild stages even if their inputs are unchanged")
        p.add_argument("--serve", action="store_true", default=name == "quickstart",
                       help="then start the Serve app and query it for a test user")
        p.add_argument("--keep-serving", action="store_true", help="keep the Serve app running until Ctrl-C")
        p.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve app (loopback)")
        p.set_defaults(func=_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `items add FILE --config X a.b=c`: overrides after the options (argparse took FILE alone)
        if getattr(args, "func", None) is _items and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console.setup(verbose=args.verbose)
    from sidrec.data.tables import DataValidationError

    try:
        return args.func(args)
    except (ConfigError, DataValidationError, FileNotFoundError) as e:
        print(f"sidrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sidrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
