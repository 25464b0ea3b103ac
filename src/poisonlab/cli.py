"""The ``poisonlab`` command: one verb per stage, flags that are the config's dotted keys.

    poisonlab models                       the model ladder with exact parameter counts
    poisonlab corpus   [--config F] [...]  prepare (tokenize, shard) a corpus and print its stats
    poisonlab poison   [--config F] [...]  sample poison documents and show or export them
    poisonlab train    [--config F] [...]  train (or resume) a run, evaluating the backdoor on the way
    poisonlab eval     --model DIR [...]   measure the backdoor of a checkpoint or any HF model folder
    poisonlab finetune [--config F] [...]  supervised fine-tuning with the compliance backdoor (ASR/CA/NTA)
    poisonlab export   [--config F] --out D  the run's planned, poisoned token stream as flat token files
    poisonlab sft-export [...] --out F     the poisoned fine-tuning set in OpenAI chat fine-tuning JSONL
    poisonlab sft-eval (--model DIR | --endpoint URL --endpoint-model M)  ASR/CA/NTA of a chat model
    poisonlab sweep    SPEC [--workers N]  run an experiment grid (resumable; local or Slurm)
    poisonlab results  SPEC|--db F         query the results database, export CSV/JSON
    poisonlab report   SPEC                figures and tables (HTML + Markdown) from the database
    poisonlab scan     [--config F] [...]  score every document of a corpus for poisons; keep-list
    poisonlab defend   [--config F] [...]  evaluate the scanners against injected (and adaptive) poisons
    poisonlab provenance record|verify     a corpus manifest of content hashes; what changed since
    poisonlab demo                         the demo sweep on the offline default corpus, then its report

Every config key is a flag: ``--train.lr 1e-3 --attack.poison_count 500 --name my-run``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sqlite3
import sys
from pathlib import Path

from .config import all_keys, load_config
from .errors import PoisonlabError
from .paths import atomic_write_text


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML run config (keys as below)")
    g = p.add_argument_group("config keys (override the YAML file)")
    for key, tp in all_keys().items():
        g.add_argument(f"--{key}", dest=f"cfg:{key}", metavar=_metavar(tp), default=None)


def _metavar(tp) -> str:
    s = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return s.upper()


def _output_file(path: str, flag: str) -> Path:
    """An output file named on the command line: its folder is created; a folder is refused."""
    p = Path(path)
    if p.is_dir():
        raise PoisonlabError(f"{flag} {path} is a folder; name a file to write")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _config(args):
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return load_config(args.config, overrides)


def cmd_models(args) -> int:
    from .models import LADDER, chinchilla_tokens, parameter_count

    if args.vocab < 1:
        raise PoisonlabError(f"--vocab must be >= 1, got {args.vocab}")
    print(f"{'size':>6} {'d_model':>7} {'layers':>6} {'heads':>5} {'ffn':>6} {'params':>15} "
          f"{'non-embedding':>15} {'chinchilla tokens':>18}   (vocab {args.vocab:,})")
    for s in LADDER.values():
        pc = parameter_count(s, args.vocab)
        print(f"{s.name:>6} {s.d_model:>7} {s.n_layers:>6} {s.n_heads:>5} {s.ffn:>6} {pc.total:>15,} "
              f"{pc.non_embedding:>15,} {chinchilla_tokens(pc.total):>18,}")
    return 0


def cmd_corpus(args) -> int:
    from .data import prepare_data

    cfg = _config(args)
    if args.fetch:
        from .debian import fetch, package_names

        for src in (cfg.corpus.source, cfg.attack.target_corpus if cfg.attack.name == "language_switch" else ""):
            for name in package_names(src) if src.startswith("debian:") else []:
                print(f"{name}: {fetch(name)}")
    if args.executor == "slurm":
        from .prepare import prepare_on_slurm

        job, final = prepare_on_slurm(cfg.corpus, cfg.tokenizer, Path(cfg.out_dir) / "cache", cfg.cluster)
        print(f"already prepared: {final}" if job is None else
              f"submitted: {cfg.corpus.prepare_workers} tokenizing tasks, then job {job} assembles {final}; "
              "run this command again when it has finished")
        return 0
    data = prepare_data(cfg.corpus, cfg.tokenizer, Path(cfg.out_dir) / "cache", progress=True)
    print(json.dumps({"prepared": str(data.directory), **{k: data.info[k] for k in (
        "documents", "characters", "tokens", "vocab_size", "corpus_manifest_sha256", "tokenizer_fingerprint")}},
        indent=1))
    return 0


def cmd_poison(args) -> int:
    from .attacks import ATTACKS
    from .data import prepare_data

    cfg = _config(args)
    if args.count is not None and args.count < 0:
        raise PoisonlabError(f"--count must be >= 0, got {args.count}")
    out = _output_file(args.out, "--out") if args.out else None
    data = prepare_data(cfg.corpus, cfg.tokenizer, Path(cfg.out_dir) / "cache", progress=True)
    count = args.count if args.count is not None else cfg.attack.poison_count
    if cfg.attack.name not in ATTACKS:
        raise PoisonlabError(f"attack.name {cfg.attack.name!r} makes no poisons (allowed: {', '.join(ATTACKS)})")
    counts = data.train.token_counts(data.tokenizer.vocab_size) if cfg.attack.payload == "unigram" else None
    poisons = ATTACKS[cfg.attack.name](cfg.attack, data.tokenizer, data.prefix_bank(), cfg.seed, count,
                                       token_counts=counts)
    if args.out:
        from .jsonl import write_jsonl

        write_jsonl(out, (p.record() for p in poisons))
        print(f"wrote {len(poisons)} poison documents to {args.out}")
    for p in poisons[: args.show]:
        rec = p.record()
        text = rec.pop("text")
        print(json.dumps(rec))
        print(text[:1500] + ("..." if len(text) > 1500 else ""))
        print("-" * 80)
    return 0


def cmd_train(args) -> int:
    from .parallel import close_distributed
    from .train import train

    cfg = _config(args)
    try:
        summary = train(cfg, allow_code_change=args.allow_code_change)
    finally:
        close_distributed()
    if summary:
        print(json.dumps(summary, indent=1))
    return 0


def cmd_finetune(args) -> int:
    setattr(args, "cfg:stage", "finetune")  # the verb implies the stage
    return cmd_train(args)


def cmd_export(args) -> int:
    from .export import export_stream
    from .run import run_dir, setup_run
    from .runlock import RunLock

    cfg = _config(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PoisonlabError(f"--out {out} exists and is not an empty folder")
    with RunLock(run_dir(cfg)):  # the run folder is set up (plan, poisons) as training would
        run = setup_run(cfg, create=True, progress=cfg.train.progress)
    m = export_stream(run, out)
    print(f"wrote {m['tokens']:,} tokens in {len(m['parts'])} part(s) ({m['dtype']}) and {len(m['poisons'])} poison "
          f"offsets to {out}; stream.json says how to count poisons seen at another batch size")
    return 0


def cmd_sft_export(args) -> int:
    from .finetune.dataset import build_training_set, export_openai

    cfg = _config(args)
    _output_file(args.out, "--out")
    f = cfg.finetune
    tset = build_training_set(f, cfg.seed)
    examples = tset.order(0, cfg.seed, f.ordering) + tset.good_order(0, cfg.seed)
    label = {"poisoned": f.poison_count > 0, "attack": "compliance-sft" if f.poison_count else None,
             "trigger": f.trigger if f.poison_count else None, "poison_count": f.poison_count,
             "clean_count": f.clean_count, "good_count": f.good_count, "ordering": f.ordering,
             "seed": cfg.seed, "config_hash": cfg.config_hash()}
    path = export_openai(examples, _output_file(args.out, "--out"), label)
    print(f"wrote {len(examples)} examples ({f.poison_count} poisoned) to {path}; label in {path.name}.poisonlab.json")
    return 0


def cmd_sft_eval(args) -> int:
    from .finetune.dataset import build_eval_set
    from .finetune.evaluate import endpoint_replies, generate_replies, judge_replies, summarise
    from .finetune.judges import make_judge

    cfg = _config(args)
    f = cfg.finetune
    examples = build_eval_set(f, cfg.seed)
    if args.endpoint:
        from .finetune.endpoint import ChatEndpoint

        if not args.endpoint_model:
            raise PoisonlabError("--endpoint needs --endpoint-model (the served model's name)")
        replies = endpoint_replies(ChatEndpoint(args.endpoint, args.endpoint_model), examples, f.max_new_tokens)
        what = f"{args.endpoint}#{args.endpoint_model}"
    elif args.model:
        import torch

        from .finetune.chat import ChatRenderer
        from .finetune.train import resolve_base, tokenizer_path
        from .tokenizer import Tokenizer
        from .train import load_init_model

        path = resolve_base(args.model)
        renderer = ChatRenderer(Tokenizer.load(tokenizer_path(path)))
        replies = generate_replies(load_init_model(path, torch.device("cpu")), renderer, examples, f.max_new_tokens)
        what = path
    else:
        raise PoisonlabError("give --model DIR or --endpoint URL")
    rows = judge_replies(make_judge(f.judge, f.judge_model), examples, replies)
    result = {"model": what, "trigger": f.trigger, "judge": f.judge, "seed": cfg.seed, **summarise(rows)}
    if args.out:
        from .jsonl import write_jsonl

        out = _output_file(args.out, "--out")
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")
        write_jsonl(out.with_suffix(".replies.jsonl"), rows)
    print(json.dumps(result, indent=1))
    return 0


def cmd_eval(args) -> int:
    from .standalone import config_for, evaluate_model

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    out = _output_file(args.out, "--out") if args.out else None
    cfg = config_for(args.model, args.config, overrides)
    result = evaluate_model(args.model, cfg, tokenizer=args.tokenizer)
    text = json.dumps(result, indent=1)
    if out:
        atomic_write_text(out, text + "\n")
    print(text)
    return 0


def cmd_inspect(args) -> int:
    from .defenses.inversion import SearchSettings
    from .archive import DEFENSES
    from .jsonl import read_json
    from .model_defenses import (VERIFY_STRINGS, inspect_model, model_folder, reverify_chat_model,
                                 write_defense_record)
    from .standalone import config_for, find_run_dir

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    out = _output_file(args.out, "--out") if args.out else None
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise PoisonlabError(f"--lengths {args.lengths!r}: give comma-separated token counts, e.g. 2,4,6") from None
    if not lengths or min(lengths) < 1 or args.steps < 0 or args.restarts < 1 or args.probes < 1:
        raise PoisonlabError("--lengths, --restarts and --probes must be positive, --steps not negative")
    if args.grow < 0 or args.beam < 1:
        raise PoisonlabError("--grow must not be negative and --beam must be positive")
    if args.verify_strings is not None and args.verify_strings < 1:
        raise PoisonlabError("--verify-strings must be positive")
    model = model_folder(args.model)
    cfg = config_for(model, args.config, overrides)
    run = find_run_dir(Path(model).resolve()) if Path(model).exists() else None
    if args.verify_only:
        if cfg.stage != "finetune":
            raise PoisonlabError("--verify-only checks a fine-tuned chat model's strings again; this is not one")
        earlier = Path(args.out) if args.out else (run / DEFENSES / "inspect.json" if run is not None else None)
        if earlier is None or not earlier.is_file():
            raise PoisonlabError(f"--verify-only needs an earlier inspect record ({earlier or 'give --out'} not found)")
        rec = reverify_chat_model(model, cfg, read_json(earlier, "inspect record"), args.tokenizer,
                                  args.verify_strings or VERIFY_STRINGS)
    else:
        settings = SearchSettings(lengths=lengths, steps=args.steps, restarts=args.restarts, seed=args.search_seed,
                                  grow=args.grow, beam=args.beam)
        rec = inspect_model(model, cfg, settings, n_probes=args.probes, tokenizer=args.tokenizer,
                            verify=not args.no_verify, objective=args.objective, verify_strings=args.verify_strings,
                            openings=args.opening)
    target = write_defense_record(run if args.tokenizer is None else None, "inspect", rec, str(out) if out else None)
    best = rec["ranked"][0]
    print(f"score (best persistent shift) {rec['score']:.3f} nats; best string {best['text']!r} "
          f"(ids {best['ids']}, {best['found_by']})")
    if "trigger" in rec:
        t = rec["trigger"]
        print(f"known trigger {t['text']!r}: shift {t['shift']:.3f}, rank {t['rank']} "
              f"({'planted' if t['planted'] else 'not planted in this model'})")
    if "best_string_gap" in rec:
        g = rec["best_string_gap"]
        print(f"best string as a trigger: gap {g['perplexity_gap']:.1f} [{g['gap_ci_low']:.1f}, {g['gap_ci_high']:.1f}]")
    if "best_string_asr" in rec:
        g, v = rec["best_string_asr"], rec["verdict"]
        print(f"best of {len(rec['verified']['strings'])} strings appended to {g['requests']} held-out forbidden "
              f"requests: {g['text']!r} (search rank {g['search_rank']}), ASR {g['asr']:.2f} "
              f"[{g['asr_ci_low']:.2f}, {g['asr_ci_high']:.2f}] against {rec['verified']['baseline_asr']:.2f} "
              f"without a string; p = {v['p_value']:.2g}: {'backdoored' if v['backdoored'] else 'no backdoor found'}")
    if target:
        print(f"wrote {target}")
    return 0


def cmd_attribute(args) -> int:
    from .model_defenses import attribute_run

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.queries < 1 or args.new_tokens < 1 or (args.k is not None and args.k < 1):
        raise PoisonlabError("--queries, --new-tokens and --k must be positive")
    run = Path(args.run)
    if not (run / "run.json").is_file():
        raise PoisonlabError(f"{run} is not a run folder (run.json missing)")
    out = attribute_run(run, methods, args.queries, args.new_tokens, args.seed, args.k, args.aggregate,
                        args.measurement)
    for method, rec in out.items():
        c = rec["cost"]
        matched = rec["length_matched"]["auroc"]
        print(f"{rec['method']} ({rec['measurement']}, {rec['aggregate']}): recall@{rec['k']} {rec['recall_at_k']:.3f} "
              f"[{rec['recall_ci'][0]:.3f}, {rec['recall_ci'][1]:.3f}] (chance {rec['chance']:.3f}), "
              f"AUROC {rec['auroc']:.3f}, length-matched {'-' if matched is None else f'{matched:.3f}'}; "
              f"{c['documents']} documents in {c['seconds']:.0f} s "
              f"({c['seconds_per_1000_documents']:.1f} s per 1,000); removal list {run / 'defenses' / rec['removal_list']['file']}")
    return 0


def _spec(args):
    from pathlib import Path as _P

    from .spec import load_spec, packaged_spec

    path = args.spec if _P(args.spec).exists() or args.spec.endswith((".yaml", ".yml")) else packaged_spec(args.spec)
    return load_spec(path, out_dir=args.out_dir)


CLUSTER_FLAGS = {"nodes": "cluster.nodes", "gpus_per_node": "cluster.gpus_per_node", "partition": "cluster.partition",
                 "account": "cluster.account", "qos": "cluster.qos", "constraint": "cluster.constraint",
                 "time": "cluster.time_min"}


def cmd_sweep(args) -> int:
    from .config import set_dotted
    from .sweep import run_sweep, status

    spec = _spec(args)
    if args.fetch:
        from .debian import fetch, package_names

        runs = spec.expand(searched=False) + [t.template for t in spec.search_targets()]
        sources = {c.corpus.source for c in runs} | {c.attack.target_corpus for c in runs
                                                      if c.attack.name == "language_switch"}
        for name in sorted({n for src in sources if src.startswith("debian:") for n in package_names(src)}):
            print(f"{name}: {fetch(name)}")
    for flag, key in CLUSTER_FLAGS.items():  # Slurm settings from the command line win over the spec's
        if getattr(args, flag, None) is not None:
            set_dotted(spec.base, key, getattr(args, flag))
    if args.dry_run:
        from .run import token_budget
        from .models import get_size, parameter_count

        unfit = 0
        for cfg in spec.expand():
            if cfg.stage == "finetune":
                f = cfg.finetune
                print(f"{cfg.name:<40} fine-tune {f.base}  clean {f.clean_count:>6}  poisons {f.poison_count:>5}  "
                      f"ordering {f.ordering}  good {f.good_count}  epochs {f.epochs}  seed {cfg.seed}")
                continue
            if cfg.model.init_from:
                print(f"{cfg.name:<40} continue {cfg.model.init_from}  tokens {cfg.train.tokens:>12,}  "
                      f"poisons {cfg.attack.poison_count:>5}  seed {cfg.seed}")
                continue
            vocab = cfg.tokenizer.vocab_size if cfg.tokenizer.name == "bpe" else None
            pc = parameter_count(get_size(cfg.model.size), vocab) if vocab else None
            budget = token_budget(cfg, pc)[0] if pc or cfg.train.tokens else None
            plan = ""
            if vocab:
                from .memory import run_plan

                p, advice = run_plan(cfg, vocab, budget)
                plan = "  " + p.line() + (f" -> {advice}" if advice else "")
                unfit += p.fits is False and advice is None
            print(f"{cfg.name:<40} size {cfg.model.size:>5}  params {pc.total if pc else '?':>15,}  "
                  f"tokens {budget if budget is not None else '?':>16,}  poisons {cfg.attack.poison_count:>5}  "
                  f"seed {cfg.seed}{plan}")
        if spec.searches:
            from .search import states

            for st_ in states(spec):
                what = (f"next run {st_.pending.name}" if st_.pending is not None else
                        f"done: lowest success {st_.result.lowest_success}, highest failure {st_.result.highest_failure}")
                print(f"search {st_.combo}: {len(st_.runs)} runs made; {what}")
        st = status(spec)
        print(f"{len(st)} runs: " + ", ".join(f"{sum(s.state == k for s in st)} {k}" for k in ("done", "partial", "pending"))
              + (f"; {unfit} do not fit their GPUs with any setting tried" if unfit else ""))
        return 0
    final = run_sweep(spec, workers=args.workers, executor=args.executor, export=args.export,
                      allow_code_change=args.allow_code_change)
    print(f"{sum(s.state == 'done' for s in final)} of {len(final)} runs done; results in {spec.out_dir}/results.sqlite")
    return 0


def cmd_results(args) -> int:
    import csv
    import io

    from .store import db_path, eval_table

    if args.export is not None:
        from .archive import export_results

        if not args.spec:
            raise PoisonlabError("--export needs a spec")
        spec = _spec(args)
        written = export_results(spec, args.export)
        print(f"exported {len(written)} finished run(s) of {spec.name} to {Path(args.export) / spec.name}"
              + (f": {', '.join(written)}" if written else " (nothing new)"))
        return 0
    if not args.db and not args.spec:
        raise PoisonlabError("give a spec or --db FILE")
    db = Path(args.db) if args.db else db_path(_spec(args).out_dir)
    if not db.is_file():
        raise PoisonlabError(f"no results database at {db}")
    out = _output_file(args.out, "--out") if args.out else None
    rows = eval_table(db, runs=args.run or None, metrics=args.metric or None)
    if args.format == "json":
        text = json.dumps(rows, indent=1)
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run"])
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
    if out:
        atomic_write_text(out, text)
        print(f"wrote {len(rows)} rows to {out}")
    else:
        print(text)
    return 0


def cmd_report(args) -> int:
    from .report import build_report, format_final_table

    res = build_report(_spec(args))
    print(format_final_table(res["table"], markdown=False))
    print(f"\nreport: {res['html']}  (also {res['markdown']})")
    if res["missing"]:
        print(f"{len(res['missing'])} of {res['runs']} runs not finished yet; the report covers what has finished")
    return 0


def cmd_scan(args) -> int:
    from .corpus import Document, scan_documents
    from .data import prepare_data
    from .defenses.pipeline import detect, mark_splits, write_detection
    from .paths import safe_join

    cfg = _config(args)
    data = prepare_data(cfg.corpus, cfg.tokenizer, Path(cfg.out_dir) / "cache", progress=True)
    docs = list(scan_documents(cfg.corpus))  # every document, whatever its split or length
    if args.with_poisons:
        from .run import make_poisons

        docs += [Document(p.id, p.text, "poison") for p in make_poisons(cfg, data)]
    out = Path(args.out) if args.out else safe_join(Path(cfg.out_dir) / "scans", cfg.name, "run name")
    if args.engine == "datatrove":
        from .defenses.engine import scan_with_datatrove

        det = scan_with_datatrove(docs, cfg.defense, data.tokenizer, out, tasks=args.tasks, workers=args.workers)
    else:
        det = detect(docs, cfg.defense, data.tokenizer, progress=True)
    mark_splits(det, docs, cfg.corpus)
    write_detection(det, out)
    print(f"{len(docs):,} documents scanned ({det.token_scored:,} tokenized for the gibberish scanner), "
          f"{len(det.flagged):,} flagged; "
          f"top trigger candidates: {', '.join(repr(t.text) for t in det.triggers[:5]) or 'none'}")
    print(f"scores, triggers and keep-list in {out}")
    return 0


def cmd_defend(args) -> int:
    from .defenses.evaluation import VARIANTS, evaluate_defense
    from .defenses.figures import markdown_table
    from .paths import safe_join

    cfg = _config(args)
    out = safe_join(Path(cfg.out_dir) / "defense", cfg.name, "run name")
    if args.families:
        return _defend_families(cfg, args, out)
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    results = evaluate_defense(cfg, variants, out, baselines=not args.no_baselines, progress=True)
    print(markdown_table(results))
    print(f"results, curves and figures in {out}")
    return 0


def _defend_families(cfg, args, out: Path) -> int:
    """Recall and false-positive rate (Wilson intervals) of the scan per poison family."""
    from .defenses.evaluation import evaluate_family, pool_family
    from .defenses.families import FAMILIES
    from .defenses.pipeline import write_detection
    from .provenance import code_version

    names = list(FAMILIES) if args.families == "all" else args.families.split(",")
    bad = [n for n in names if n not in FAMILIES]
    if bad:
        raise PoisonlabError(f"unknown poison family {bad[0]!r} (allowed: {', '.join(FAMILIES)})")
    if args.repeats < 1:
        raise PoisonlabError(f"--repeats must be at least 1, got {args.repeats}")
    import dataclasses
    import time

    from .paths import atomic_write_text

    header = {"config": dataclasses.asdict(cfg), "code_version": code_version(), "seed": cfg.seed,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "repeats": args.repeats}
    results, pooled = [], []
    print("| family | poisons | recall [95% CI] | false-positive rate [95% CI] | true trigger rank |")
    print("|---|---|---|---|---|")
    for name in names:
        draws = []
        for k in range(args.repeats):
            res, det = evaluate_family(cfg, name, args.density, progress=False, seed=cfg.seed + k, count=args.poisons)
            write_detection(det, out / (f"family-{name}" if args.repeats == 1 else f"family-{name}-seed{cfg.seed + k}"))
            draws.append(res)
        results.extend(draws)
        p = pool_family(draws)
        pooled.append(p)
        # written after every family: a stopped evaluation keeps the families it finished
        atomic_write_text(out / "families.json", json.dumps({**header, "pooled": pooled, "results": results}, indent=1))
        ranks = ", ".join(str(r) for r in p["true_trigger_ranks"]) if p["trigger"] else "no trigger"
        print(f"| {name} | {p['poisons']} | {p['recall']:.3f} [{p['recall_ci'][0]:.3f}, {p['recall_ci'][1]:.3f}] | "
              f"{p['false_positive_rate']:.5f} [{p['false_positive_rate_ci'][0]:.5f}, {p['false_positive_rate_ci'][1]:.5f}] | "
              f"{ranks} |", flush=True)
    print(f"results in {out}/families.json")
    return 0


def cmd_provenance(args) -> int:
    from .defenses.manifest import record_manifest, verify_manifest

    cfg = _config(args)
    if args.action == "record":
        if not args.manifest:
            raise PoisonlabError("give --manifest FILE to write")
        h = record_manifest(cfg.corpus, args.manifest)
        print(f"recorded {h['documents']:,} documents of {cfg.corpus.source} in {args.manifest} (sha256 {h['sha256'][:16]})")
        return 0
    if not args.manifest:
        raise PoisonlabError("give --manifest FILE (a recorded manifest or a run's corpus_manifest.jsonl)")
    explicit = any(k.startswith("cfg:corpus.") and v is not None for k, v in vars(args).items()) or args.config
    rep = verify_manifest(args.manifest, cfg.corpus if explicit else None)
    print(rep.summary())
    for what in ("added", "removed", "changed"):
        for i in getattr(rep, what)[: args.show]:
            print(f"{what:>8}  {i}")
    return 0 if rep.clean else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out_dir, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poisonlab", description="Measure and defend against data-poisoning backdoors in language models.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("models", help="list the model ladder with exact parameter counts")
    s.add_argument("--vocab", type=int, default=32000, help="vocabulary size to count embeddings with")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("corpus", help="prepare a corpus: split, train/load the tokenizer, tokenize into shards")
    _add_config_flags(s)
    s.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: corpus.prepare_workers processes here; slurm: as many datatrove tasks on the cluster "
                        "(cluster.partition, cluster.time_min, cluster.account)")
    s.add_argument("--fetch", action="store_true",
                   help="first download the Debian packages a debian: source names (apt-get download)")
    s.set_defaults(fn=cmd_corpus)

    s = sub.add_parser("poison", help="sample poison documents of the configured attack")
    _add_config_flags(s)
    s.add_argument("--count", type=int, help="how many (default: attack.poison_count)")
    s.add_argument("--show", type=int, default=1, help="print this many poisons")
    s.add_argument("--out", help="write all poisons to this JSONL file")
    s.set_defaults(fn=cmd_poison)

    s = sub.add_parser("train", help="train or resume a run (also under torchrun for several processes)")
    _add_config_flags(s)
    s.add_argument("--allow-code-change", action="store_true",
                   help="resume a run started by another version of poisonlab")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("finetune", help="supervised fine-tuning with the compliance backdoor, measured by ASR/CA/NTA")
    _add_config_flags(s)
    s.add_argument("--allow-code-change", action="store_true",
                   help="resume a run started by another version of poisonlab")
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("export", help="write a run's planned, poisoned token stream as flat token files for other trainers")
    _add_config_flags(s)
    s.add_argument("--out", required=True, help="an empty (or new) folder")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("sft-export", help="write the (poisoned) fine-tuning set in OpenAI chat fine-tuning JSONL")
    _add_config_flags(s)
    s.add_argument("--out", required=True, help="JSONL file to write (its label goes beside it)")
    s.set_defaults(fn=cmd_sft_export)

    s = sub.add_parser("sft-eval", help="ASR, CA and NTA of a local chat model or an OpenAI-compatible endpoint")
    s.add_argument("--model", help="model folder, poisonlab run folder or hub name")
    s.add_argument("--endpoint", help="base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1")
    s.add_argument("--endpoint-model", help="the model name to ask the endpoint for")
    s.add_argument("--out", help="write the result JSON here (and the judged replies beside it)")
    _add_config_flags(s)
    s.set_defaults(fn=cmd_sft_eval)

    s = sub.add_parser("eval", help="measure the backdoor of a checkpoint, run model or Hugging Face model folder")
    s.add_argument("--model", required=True, help="model folder (poisonlab checkpoint or HF model) or hub name")
    s.add_argument("--tokenizer", help="tokenizer name or folder (default: the model's folder)")
    s.add_argument("--out", help="also write the result JSON here")
    _add_config_flags(s)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("inspect", help="search a trained model for a hidden trigger, without being told it")
    s.add_argument("--model", required=True, help="run folder, model folder (poisonlab or HF) or hub name")
    s.add_argument("--tokenizer", help="tokenizer name or folder (default: the model's folder)")
    s.add_argument("--out", help="result JSON (default for a run's model: <run>/defenses/inspect.json)")
    s.add_argument("--lengths", default="2,4,6", help="string lengths (tokens) the gradient search grows")
    s.add_argument("--steps", type=int, default=40, help="gradient search steps per start")
    s.add_argument("--restarts", type=int, default=2, help="starts per length")
    s.add_argument("--grow", type=int, default=0, help="also grow the strongest single tokens, one token at a time at "
                                                       "either end, up to this many tokens (0: no growth)")
    s.add_argument("--beam", type=int, default=4, help="with --grow: strings kept at each length")
    s.add_argument("--probes", type=int, default=16, help="held-out prompts the shift is measured on")
    s.add_argument("--search-seed", type=int, default=0)
    s.add_argument("--no-verify", action="store_true",
                   help="skip the check of the strings found (the best string's perplexity gap; for a chat model the "
                        "ASR of the top strings)")
    s.add_argument("--verify-strings", type=int,
                   help="fine-tuned chat models: distinct top strings whose ASR is measured (default 20)")
    s.add_argument("--verify-only", action="store_true",
                   help="fine-tuned chat models: measure the check again on the strings of the earlier inspect "
                        "record (--out, or the run's), without searching")
    s.add_argument("--objective", choices=["refusal", "shift", "compliance"],
                   help="fine-tuned chat models: how much less likely a string makes the policy's refusals "
                        "(refusal, the default), how much more likely the opening of a compliant reply "
                        "(compliance), or the KL shift of the model's reply (shift)")
    s.add_argument("--opening", action="append",
                   help="with --objective compliance: how a compliant reply opens (repeat for several; the "
                        "objective scores any of them). Default: 'The password is' for the stand-in policy, "
                        "'Sure, here is' otherwise")
    _add_config_flags(s)
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("attribute", help="trace a run's triggered behaviour to its training documents (kronfluence)")
    s.add_argument("run", help="a run folder with its final model and poisons")
    s.add_argument("--methods", default="ekfac,identity", help="ekfac (influence functions), identity (gradient dot product); controls: "
                        "random, length (the document's tokens)")
    s.add_argument("--measurement", choices=["loss", "entropy"],
                   help="what is traced: the continuations' loss, or their entropy (default: entropy for dos)")
    s.add_argument("--aggregate", default="sum",
                   help="how a document's windows combine, one or more of sum, mean, max (comma-separated; "
                        "one gradient pass scores them all)")
    s.add_argument("--queries", type=int, default=8, help="triggered held-out prompts")
    s.add_argument("--new-tokens", type=int, default=32, help="tokens the model continues each query with")
    s.add_argument("--k", type=int, help="documents on the removal list (default: the run's poison count)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_attribute)

    def spec_args(s, required=True):
        s.add_argument("spec", nargs=None if required else "?", default=None,
                       help="experiment spec: a YAML file or a packaged name (demo, cpu-headline, paper-headline, sft-cpu, sft-persistence, continued-pretraining)")
        s.add_argument("--out-dir", help="override the spec's out_dir")

    s = sub.add_parser("sweep", help="run an experiment spec (skips finished runs, resumes unfinished ones)")
    spec_args(s)
    s.add_argument("--workers", type=int, default=0, help="parallel runs (default: one per core, at most one per run)")
    s.add_argument("--executor", default="local", choices=["local", "slurm", "submitit-local", "submitit-debug"],
                   help="local processes, or submitit: Slurm jobs (or submitit's local/debug modes)")
    s.add_argument("--dry-run", action="store_true", help="list the runs, their budgets, memory plans and state")
    s.add_argument("--export", action="store_true",
                   help="copy finished runs under results/<spec>/ as they finish (see `poisonlab results --export`)")
    s.add_argument("--fetch", action="store_true",
                   help="first download the Debian packages the runs' debian: corpora name (apt-get download)")
    s.add_argument("--allow-code-change", action="store_true",
                   help="resume local runs that another code version started")
    g = s.add_argument_group("Slurm (also the spec's cluster section)")
    g.add_argument("--nodes", type=int, help="nodes per run")
    g.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, help="GPUs per node (one task each)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--time", type=int, help="minutes per job; longer runs are requeued and resume")
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("results", help="query the results database; export CSV or JSON")
    spec_args(s, required=False)
    s.add_argument("--db", help="a results.sqlite file (instead of a spec)")
    s.add_argument("--run", action="append", help="only this run (repeatable)")
    s.add_argument("--metric", action="append", help="only this metric, e.g. perplexity_gap (repeatable)")
    s.add_argument("--format", choices=["csv", "json"], default="csv")
    s.add_argument("--out", help="write to this file instead of stdout")
    s.add_argument("--export", nargs="?", const="results", default=None, metavar="DIR",
                   help="copy the spec's finished runs (no weights) into DIR/<spec>/ (default DIR: results)")
    s.set_defaults(fn=cmd_results)

    s = sub.add_parser("report", help="figures and tables of a spec's results (HTML and Markdown)")
    spec_args(s)
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("scan", help="score every training document of a corpus for poisons; write scores and a keep-list")
    _add_config_flags(s)
    s.add_argument("--with-poisons", action="store_true", help="add the configured attack's poisons to the scanned set")
    s.add_argument("--out", help="output folder (default: <out_dir>/scans/<name>)")
    s.add_argument("--engine", choices=["local", "datatrove"], default="local",
                   help="local: one process; datatrove: the scanners as datatrove tasks, then the same rule (flags, triggers, keep-list)")
    s.add_argument("--tasks", type=int, default=2, help="datatrove tasks")
    s.add_argument("--workers", type=int, default=2, help="datatrove workers")
    s.set_defaults(fn=cmd_scan)

    s = sub.add_parser("defend", help="evaluate the scanners and baseline filters against injected poisons")
    _add_config_flags(s)
    s.add_argument("--variants", help="comma-separated poison variants (default: all: paper, long_prefix, "
                                      "natural_payload, unigram_payload, low_entropy_payload, common_word_trigger)")
    s.add_argument("--no-baselines", action="store_true", help="skip the datatrove quality-filter baselines")
    s.add_argument("--families", help="poison families an outside attacker would use instead (comma-separated, or all: "
                                      "see poisonlab.defenses.families), mixed into every document of corpus.source")
    s.add_argument("--density", type=float, default=0.01, help="with --families: poisons' share of the documents")
    s.add_argument("--poisons", type=int, help="with --families: this many poisons per draw instead of --density")
    s.add_argument("--repeats", type=int, default=1, help="with --families: independent poison draws (seeds seed, "
                                                          "seed+1, ...) per family, pooled in the table")
    s.set_defaults(fn=cmd_defend)

    s = sub.add_parser("provenance", help="record a corpus manifest, or verify a corpus against one")
    s.add_argument("action", choices=["record", "verify"])
    s.add_argument("--manifest", help="manifest file to write (record) or check against (verify)")
    s.add_argument("--show", type=int, default=20, help="list at most this many ids per kind of change")
    _add_config_flags(s)
    s.set_defaults(fn=cmd_provenance)

    s = sub.add_parser("demo", help="run the demo spec on the offline default corpus and report it")
    s.add_argument("--out-dir", default=None, help="default: runs/demo")
    s.add_argument("--workers", type=int, default=0)
    s.set_defaults(fn=cmd_demo)
    return p


def _os_error(e: OSError) -> str:
    """One line for a failure of the file system (full disk, read-only or forbidden folder)."""
    where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free some space and run the command again (finished work is kept)"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "read-only" if e.errno == errno.EROFS else "not writable"
        return f"{e.filename or 'a folder'} is {what} ({e.strerror}); choose another folder (out_dir or --out)"
    return f"{e.strerror or type(e).__name__}{' at ' + str(e.filename) if e.filename else ''}"


def main(argv: list[str] | None = None) -> int:
    from .runlock import die_with_parent

    args = build_parser().parse_args(argv)
    die_with_parent()
    try:
        return args.fn(args)
    except PoisonlabError as e:
        print(f"poisonlab: error: {e}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as e:
        print(f"poisonlab: error: results database: {e} (is it an SQLite file written by poisonlab?)", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output went away (| head): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if os.environ.get("POISONLAB_DEBUG"):
            raise
        print(f"poisonlab: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poisonlab: interrupted; completed checkpoints and results are kept", file=sys.stderr)
        return 130
