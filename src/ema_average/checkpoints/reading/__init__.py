"""Reading untrusted files without running code from them: positioned reads, safe unpickling and its cost
bound, inert placeholders, tensors at zip offsets, bounded JSON."""
