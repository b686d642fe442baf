"""Column names shared by every stage's Parquet output, in pipeline order."""

SAMPLE_ID = "sample_id"  # int64, stable id of a synthetic query in the pool
MESSAGE = "message"  # str, few-shot query-writing prompt (queries stage input)
QUERY = "query"  # str
RESPONSE = "response"  # str, the expert's answer
TOKEN_IDS = "token_ids"  # list<int64>, source-tokenizer response tokens
OFFSET_STARTS = "offset_starts"  # list<int64>, character span starts in the response
OFFSET_ENDS = "offset_ends"  # list<int64>
EXPERT_LOGPROBS = "expert_logprobs"  # list<float32>
EXPERT_TOP_LOGPROBS = "expert_top_logprobs"  # list<list<float32>>, (tokens, n) the expert's n likeliest log-probs (labels.top_logprobs)
AMATEUR_LOGPROBS = "amateur_logprobs"  # list<float32>
EXCESS = "excess"  # list<float32>, expert - amateur
N_TOKENS = "n_tokens"  # int64, response tokens (source tokenizer)
SAMPLE_SCORE = "sample_score"  # float64, mean excess (-inf for an empty response)
KEEP = "keep"  # list<bool>, top-k% token mask (source tokenizer)
TARGET_TOKEN_IDS = "target_token_ids"  # list<int64>, target-tokenizer response tokens
TARGET_WEIGHTS = "target_weights"  # list<float32>, keep mask aligned to target tokens, in [0, 1]
TARGET_TEACHER = "target_teacher"  # list<list<float32>>, (target tokens, n) teacher log-probs paired by span, NaN rows unpaired (uld)
TARGET_LOGPROBS = "target_logprobs"  # list<float32>, the target base's log-probs (filter.reference target_base/both)
