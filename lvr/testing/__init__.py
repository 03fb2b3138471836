"""Test scaffolding shipped with the package: never imported by the product (a test checks).

- `fake_server`: an OpenAI-compatible HTTP server on loopback that behaves like a real one
  (status codes, latency, malformed output, usage fields, API-key checks), for tests and the
  throughput benchmarks: `python -m lvr.testing.fake_server --help`.
- `fake_content`: the plausible captions, questions and judge verdicts it answers with.
- `bad_files`: broken and non-video files that every reader must refuse with a one-line error.
"""
