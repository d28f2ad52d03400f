"""Where `Index`, `Match` and `merge_parts` have always been imported from; they live in `siamese.search`."""

from siamese.search import Index, Match, claim_output, index_files, merge_parts, refuse_part_output

__all__ = ["Index", "Match", "claim_output", "index_files", "merge_parts", "refuse_part_output"]
