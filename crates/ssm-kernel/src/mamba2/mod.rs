//! Mamba-2 scan (per-head scalar `A`): sequential and chunked SSD, forward / backward / step.
