//! Causal depthwise 1-D convolution.
