"""The CoPE paper's reported errors (arXiv 2405.18719, Tables 2 and 3), to set our runs beside."""

# Test error (%). Flip-flop: in-distribution (val, FFL(0.8)) / OOD (val_sparse, FFL(0.98)).
FLIPFLOP = {"absolute": (6.8, 21.7), "rope": (1.8, 20.3), "cope": (0.0, 4.9)}
# Selective copy: in-distribution / OOD dense / OOD sparse.
SELECTIVE_COPY = {
    "absolute": (16.9, 25.6, 85.2),
    "rope": (40.1, 100.0, 100.0),
    "cope": (0.0, 0.0, 0.0),
}
# Counting, test error by number of variables (1, 3, 5), mean of 3 seeds.
# WikiText-103 (GPT-2 small, T=1024, npos 64) validation / test perplexity (Table 4).
WIKITEXT103 = {
    "absolute": (23.96, 24.87),
    "relative": (22.90, 23.81),
    "cope": (22.55, 23.46),
    "cope+relative": (22.31, 23.23),
}
COUNTING = {
    "absolute": {1: 5.3, 3: 67.6, 5: 71.5},
    "relative": {1: 1.1, 3: 17.8, 5: 22.4},
    "cope": {1: 0.0, 3: 1.2, 5: 7.4},
}
