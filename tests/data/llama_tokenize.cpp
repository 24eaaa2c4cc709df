// llama.cpp's tokenizer on a GGUF's vocabulary, for tests/test_gguf_tokenizer.py.
// usage: llama_tokenize MODEL.gguf < TEXT   -> the ids, comma-separated, on stdout
// (no BOS; special tokens in the text are parsed, as llama-cli does for a prompt)
#include "llama.h"

#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

static void quiet(ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf < TEXT\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "%s: cannot load the vocabulary\n", argv[1]);
        return 1;
    }
    const std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    std::vector<llama_token> ids(text.size() + 16);
    const int n = llama_tokenize(llama_model_get_vocab(model), text.data(), (int) text.size(), ids.data(),
                                 (int) ids.size(), false, true);
    if (n < 0) {
        fprintf(stderr, "tokenize failed (%d)\n", n);
        return 1;
    }
    for (int i = 0; i < n; i++) {
        printf(i ? ",%d" : "%d", ids[i]);
    }
    printf("\n");
    llama_model_free(model);
    return 0;
}
