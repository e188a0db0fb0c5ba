"""``moco-zoo`` subcommands for the zoo: ``convert``, ``list`` (and the Hub commands, added next to them).

One ``add_<name>`` function registers each subcommand and one ``cmd_<name>(args) -> int`` runs it; ``add_commands``
calls every ``add_*`` listed in ``_COMMANDS``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, List

from . import hub, publish, zoo
from .convert import convert_file

# ------------------------------------------------------------------------------------------------------------ convert


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a MoCo checkpoint (ours or official v1/v2/v3, linear-probe) to timm/torchvision/detectron2",
        description="Detects the checkpoint layout, extracts the backbone (+ trained classifier for linear-probe "
        "checkpoints) and writes it for timm (model.safetensors), torchvision (.pth) or detectron2 (.pkl).",
    )
    p.add_argument("ckpt", help="checkpoint file (or Hub-style folder)")
    p.add_argument("--to", required=True, choices=("timm", "torchvision", "detectron2"), help="output format")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--arch", default=None, help="timm architecture to check the backbone against (default: inferred)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow full unpickling of files that torch.load(weights_only=True) refuses (only for trusted files)",
    )
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    path, conv = convert_file(args.ckpt, args.to, args.out, arch=args.arch, allow_pickle=args.allow_pickle)
    what = f"classifier ({conv.num_classes} classes)" if conv.is_classifier else "backbone"
    print(
        f"{args.ckpt}: {conv.source_format} -> {args.to} {what}, arch {conv.arch or 'unknown'}, "
        f"{len(conv.state_dict)} backbone tensors -> {path}"
    )
    return 0


# --------------------------------------------------------------------------------------------------------------- list


def add_list(sub) -> None:
    p = sub.add_parser("list", help="list the zoo (hub_configs) with the published metrics")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)


def _fmt_metric(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for e in zoo.entries():
        default = zoo.default_entry(e.model)
        rows.append(
            dict(
                name=e.name,
                kind=e.kind,
                default=bool(default is not None and default.name == e.name),
                arch=e.arch,
                moco=e.moco_version,
                epochs=e.recipe.get("epochs"),
                published=e.published,
                hub=e.hub.repo_id,
                source=e.source.url,
                license=e.license,
                metrics=e.metrics,
            )
        )
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "arch", "moco", "ep", "IN top-1", "VOC AP50/AP/AP75", "weights")
    table: List[tuple] = [header]
    for r in rows:
        m = r["metrics"]
        top1 = m.get("imagenet_linear_top1", m.get("imagenet_top1", "-"))
        voc = "/".join(_fmt_metric(m[k]) for k in ("voc0712_r50c4_ap50", "voc0712_r50c4_ap", "voc0712_r50c4_ap75")
                       if k in m) or "-"
        name = r["name"] + (" (default)" if r["default"] else "")
        weights = f"hf-hub:{r['hub']}" if r["published"] else "official url (converted on load)"
        table.append((name, r["arch"], r["moco"], str(r["epochs"] or "-"), _fmt_metric(top1), voc, weights))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


# ====================================================================================================================
# Hub commands: publish, download, import-official (implemented in moco_zoo.publish and moco_zoo.hub; this block registers them)
# ====================================================================================================================


def add_publish(sub) -> None:
    p = sub.add_parser(
        "publish",
        help="write a Hub-ready folder (config.json, model.safetensors, detectron2.pkl, model card) and upload it",
        description="Converts CKPT (any format `moco-zoo convert` reads), checks it strict-loads into the timm "
        "architecture of the zoo entry, writes the Hub folder (timm config.json with the plain timm architecture, "
        "model.safetensors, detectron2.pkl for ResNets, README.md model card with metrics, usage, sha256 checksums and "
        "citation) and uploads it with huggingface_hub (create_repo + upload_folder) unless --dry-run.",
    )
    p.add_argument("ckpt", help="checkpoint to publish (ours, official MoCo v1/v2/v3, linear-probe, converted)")
    p.add_argument("--config", required=True, help="hub_configs/*.yaml of the release (or its zoo name)")
    p.add_argument("--repo-id", default=None, help="Hub repo ORG/NAME (default: hub.repo_id of the config)")
    p.add_argument("--local-dir", default=None, help="write the Hub folder here (kept); default: a temporary folder")
    p.add_argument("--dry-run", action="store_true", help="only write the folder, do not upload")
    p.add_argument("--endpoint", default=None, help="Hub endpoint URL (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--token", default=None, help="Hub token (default: the saved login / $HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--metrics", nargs="*", default=[], metavar="JSON",
                   help="metrics JSON files from this project's runs, added to the model card's metrics table")
    p.add_argument("--eval-results", nargs="*", default=[], metavar="RESULTS_JSON",
                   help="results.json of `moco-zoo eval`: every protocol's mean (+- std over seeds) goes into the "
                   "model card's model-index (huggingface_hub EvalResult) and metrics table")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow full unpickling of CKPT if weights_only loading refuses it (trusted files only)")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args: argparse.Namespace) -> int:
    dry = bool(args.dry_run)
    folder, url = publish.publish(
        args.ckpt, args.config, args.repo_id, local_dir=args.local_dir, dry_run=dry, endpoint=args.endpoint,
        token=args.token, private=True if args.private else None, metrics_files=args.metrics,
        eval_results_files=args.eval_results, allow_pickle=args.allow_pickle,
    )
    files = ", ".join(f"{n} (sha256 {h[:12]})" for n, h in folder.files.items())
    if dry or args.local_dir:
        print(f"Hub folder for {folder.entry.name} -> {folder.repo_id}: {folder.path} [{files}, README.md]")
    if url:
        print(f"published {folder.entry.name} to {folder.repo_id}: {url}")
    else:
        print(f"dry run: nothing uploaded (upload with `moco-zoo publish ... --repo-id {folder.repo_id}`)")
    return 0


def add_download(sub) -> None:
    p = sub.add_parser(
        "download",
        help="fetch a zoo model (or ORG/REPO) through the Hugging Face cache and print its local path",
        description="Downloads config.json, model.safetensors, detectron2.pkl and README.md of the model's Hub repo "
        "into the Hugging Face cache (HF_HOME / HF_HUB_CACHE) and prints the snapshot folder. With HF_HUB_OFFLINE=1 "
        "only the cache is used.",
    )
    p.add_argument("name", help="zoo name (moco_r50, moco_r50.v2_800ep) or Hub repo id ORG/REPO")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--file", default=None, help="download only this file and print its path")
    p.add_argument("--endpoint", default=None, help="Hub endpoint URL (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $HF_HUB_CACHE or $HF_HOME/hub)")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    path = hub.download(args.name, revision=args.revision, filename=args.file, endpoint=args.endpoint,
                        cache_dir=args.cache_dir)
    print(path)
    return 0


def add_import_official(sub) -> None:
    p = sub.add_parser(
        "import-official",
        help="download the authors' release of a zoo entry, verify its checksum, convert it and prepare the Hub folder",
        description="Fetches the official checkpoint named in hub_configs (or uses --file), checks the md5 prefix "
        "published by the authors, converts it and writes the Hub folder (upload it with `moco-zoo publish` or "
        "`huggingface-cli upload`).",
    )
    p.add_argument("name", help="zoo name (e.g. moco_r50.v2_800ep, moco_r50.v3_300ep_lincls_in1k) or hub_configs file")
    p.add_argument("--file", default=None, help="use this local copy of the official file instead of downloading")
    p.add_argument("--url", default=None, help="download from this URL instead of the one in hub_configs (a mirror)")
    p.add_argument("--md5", default=None, help="expected md5 prefix (default: the published one from hub_configs)")
    p.add_argument("--out", default=None, help="Hub folder to write (default: ./hub_folders/<name>)")
    p.add_argument("--download-dir", default=None,
                   help="where downloads are kept (default: $MOCO_ZOO_DATA/official or ~/.cache/moco_zoo/official)")
    p.add_argument("--repo-id", default=None, help="Hub repo id used in the model card (default: from hub_configs)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow full unpickling if weights_only loading refuses the file (trusted files only)")
    p.set_defaults(func=cmd_import_official)


def cmd_import_official(args: argparse.Namespace) -> int:
    folder = publish.import_official(args.name, file=args.file, url=args.url, expected_md5=args.md5, out_dir=args.out,
                                     download_dir=args.download_dir, repo_id=args.repo_id,
                                     allow_pickle=args.allow_pickle)
    print(f"{folder.entry.name}: Hub folder for {folder.repo_id} written to {folder.path}")
    for name, digest in folder.files.items():
        print(f"  {name}  sha256 {digest}")
    return 0


_HUB_COMMANDS: List[Callable] = [add_publish, add_download, add_import_official]

# ====================================================================================================================
# end of Hub commands
# ====================================================================================================================


# ------------------------------------------------------------------------------------------------------- registration

# Each item registers one subcommand; the Hub commands (publish, download, import-official) are appended here.
_COMMANDS: List[Callable] = [add_convert, add_list] + _HUB_COMMANDS


def add_commands(subparsers) -> None:
    for add in _COMMANDS:
        add(subparsers)


def main(argv=None) -> int:
    """Run only the zoo subcommands (``python -m moco_zoo.zoo_cli ...``)."""
    parser = argparse.ArgumentParser(prog="moco-zoo")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        print(f"moco-zoo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
