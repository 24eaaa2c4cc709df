// flashmoe-llama-run: llama.cpp's forward over given token ids, timed per token, for bench/llama_cpp.py.
//
// usage: flashmoe-llama-run MODEL.gguf THREADS PASSES LOGITS_OUT PROMPT_IDS DECODE_IDS [--no-repack] [KEY=INT]
//   PROMPT_IDS, DECODE_IDS: comma-separated token ids. Each pass clears the KV cache, prefills the prompt in
//   one batch, then decodes DECODE_IDS one token per llama_decode (teacher-forced: the given ids, not
//   sampled ones), exactly the work bench/decode_run.py times for flashmoe.
//   LOGITS_OUT: '-' or a file that receives, from the first pass, the float32 logits of every position
//   ([prompt + decode tokens, n_vocab], row-major) for comparing with flashmoe's.
//   --no-repack: leave the weights in the mmap'd file (llama-cli's --no-repack); by default llama.cpp
//   copies Q4_0 weights into repacked anonymous buffers, which needs memory for the whole model.
//   KEY=INT: an integer metadata override, e.g. qwen3moe.expert_used_count=4 to run with another k.
// Prints one JSON object per pass on stdout: {"pass": i, "prefill_ms": x, "token_ms": [...]}.
// The model is loaded with llama.cpp's default parameters (mmap, what llama-cli does).
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static std::vector<llama_token> parse_ids(const char * s) {
    std::vector<llama_token> ids;
    char * end = nullptr;
    for (const char * p = s; *p; p = *end == ',' ? end + 1 : end) {
        const long id = strtol(p, &end, 10);
        if (end == p) {
            break;
        }
        ids.push_back((llama_token) id);
    }
    return ids;
}

static void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char ** argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s MODEL.gguf THREADS PASSES LOGITS_OUT PROMPT_IDS DECODE_IDS [--no-repack] [KEY=INT]\n",
                argv[0]);
        return 2;
    }
    const int threads = atoi(argv[2]);
    const int passes = atoi(argv[3]);
    const std::string logits_out = argv[4];
    const std::vector<llama_token> prompt = parse_ids(argv[5]);
    const std::vector<llama_token> decode = parse_ids(argv[6]);
    if (prompt.empty()) {
        fprintf(stderr, "empty prompt\n");
        return 2;
    }
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    llama_model_kv_override overrides[2] = {};
    for (int i = 7; i < argc; ++i) {
        if (strcmp(argv[i], "--no-repack") == 0) {
            mp.use_extra_bufts = false;
            continue;
        }
        const char * eq = strchr(argv[i], '=');
        if (!eq || eq - argv[i] >= (long) sizeof(overrides[0].key)) {
            fprintf(stderr, "bad option %s (--no-repack or KEY=INT)\n", argv[i]);
            return 2;
        }
        memcpy(overrides[0].key, argv[i], eq - argv[i]);
        overrides[0].tag = LLAMA_KV_OVERRIDE_TYPE_INT;
        overrides[0].val_i64 = strtoll(eq + 1, nullptr, 10);
        mp.kv_overrides = overrides;
    }
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "%s: cannot load the model\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (prompt.size() + decode.size() + 16);
    cp.n_batch = cp.n_ubatch = (uint32_t) prompt.size();
    cp.n_threads = cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    FILE * logits_file = logits_out == "-" ? nullptr : fopen(logits_out.c_str(), "wb");

    llama_batch batch = llama_batch_init((int32_t) prompt.size(), 0, 1);
    for (int pass = 0; pass < passes; ++pass) {
        llama_memory_clear(llama_get_memory(ctx), true);
        const bool save = pass == 0 && logits_file;
        batch.n_tokens = (int32_t) prompt.size();
        for (int i = 0; i < batch.n_tokens; ++i) {
            batch.token[i] = prompt[i];
            batch.pos[i] = i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = save || i == batch.n_tokens - 1;
        }
        double t0 = now_ms();
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed on the prompt\n");
            return 1;
        }
        const double prefill_ms = now_ms() - t0;
        if (save) {
            for (int i = 0; i < batch.n_tokens; ++i) {
                fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, logits_file);
            }
        }
        std::vector<double> token_ms;
        for (size_t j = 0; j < decode.size(); ++j) {
            batch.n_tokens = 1;
            batch.token[0] = decode[j];
            batch.pos[0] = (llama_pos) (prompt.size() + j);
            batch.n_seq_id[0] = 1;
            batch.seq_id[0][0] = 0;
            batch.logits[0] = 1;
            t0 = now_ms();
            if (llama_decode(ctx, batch) != 0) {
                fprintf(stderr, "llama_decode failed on decode token %zu\n", j);
                return 1;
            }
            const float * logits = llama_get_logits_ith(ctx, 0);  // waits for the computation
            token_ms.push_back(now_ms() - t0);
            if (save) {
                fwrite(logits, sizeof(float), n_vocab, logits_file);
            }
        }
        printf("{\"pass\": %d, \"prefill_ms\": %.3f, \"token_ms\": [", pass, prefill_ms);
        for (size_t j = 0; j < token_ms.size(); ++j) {
            printf("%s%.3f", j ? ", " : "", token_ms[j]);
        }
        printf("]}\n");
        fflush(stdout);
    }
    if (logits_file) {
        fclose(logits_file);
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
