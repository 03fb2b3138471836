"""Evaluation of long-video VLMs: benchmark adapters, answer extraction, scoring, reports.

Modules (imported on use; this package imports nothing so that ``lvr --help`` stays fast):

- ``sources``, ``benchmarks``, ``recent_benchmarks``, ``options``, ``filecheck``: benchmark files as
  published -> the ``questions`` table (one line when a file is not the benchmark's).
- ``extract``: ``extract_choice`` (ranked, documented rules), ``strict_match``, ``format_ok``.
- ``prompting``: question + frames -> backend request (prompts shared with SFT/RL), rows.
- ``judge``: optional Yes/No LLM judge for open-ended answers.
- ``scoring``: accuracies, Wilson/bootstrap CIs, constant-letter floor, pass rates; ``official``: the
  benchmark-specific rules (Video-MME-v2 grouped non-linear score, LVBench multi-label types).
- ``reasons``: error messages grouped by reason; ``export``: questions -> a ``qa`` table.
- ``vllm_backend``: offline batched vLLM generation for ``--backend vllm``.
- ``runner``: ``run_eval`` (resumable, frame sweeps); ``report``: Markdown/HTML with plots.

``lvr.eval`` never imports ``lvr.datagen``: it reads only the Parquet contract.
"""
