//! Datasets: formats (Alpaca, ShareGPT/chat, plain text), chat templates, tokenization,
//! truncation and packing, loss masks and the validation split.
