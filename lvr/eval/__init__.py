"""Evaluation of long-video VLMs: benchmark adapters, answer extraction, scoring, reports.

Modules (imported on use; this package imports nothing so that ``lvr --help`` stays fast):

- ``sources``, ``benchmarks``: published benchmark formats -> the ``questions`` table.
- ``extract``: ``extract_choice`` (ranked, documented rules), ``strict_match``, ``format_ok``.
- ``prompting``: question + frames -> backend request (prompts shared with SFT/RL), rows.
- ``judge``: optional Yes/No LLM judge for open-ended answers.
- ``scoring``: accuracies, bootstrap CIs, constant-letter floor, pass rates.
- ``runner``: ``run_eval`` (resumable, frame sweeps); ``report``: Markdown/HTML with plots.

``lvr.eval`` never imports ``lvr.datagen``: it reads only the Parquet contract.
"""
