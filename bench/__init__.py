"""cxrlite.bench: the benchmarks behind `cxrlite bench` (cxrlite.commands.bench).

latency (the engine of `cxrlite bench BUNDLE`) runs jobs (settings, job specs) in a worker,
each timing vision_phase or llm_phase on backends opened by backends, with memory sampling;
report turns results into tables and plots; shapes builds random-weight bundles of real size.
The other tools: server_compare and soak (with servers), loadtest, llama_bench, bandwidth,
vision_micro; options holds what their command lines share.
"""
