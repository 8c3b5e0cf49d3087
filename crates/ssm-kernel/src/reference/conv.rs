//! Reference causal depthwise conv.
