"""The Llama-family model: config, checkpoint loading, tokenizer and the decoder itself."""
