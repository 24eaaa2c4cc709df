"""Chat templates in the styles of real models, for the chat, tool-call and server tests (written here from the
public templates' structure; no downloads).

- QWEN3: ChatML with JSON tool calls (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), thinking
  (`enable_thinking`), reversed-message namespace scan and `<tool_response>` merging, as Qwen3 ships it.
- QWEN35_XML: ChatML with Qwen3-Coder XML tool calls (`<function=...><parameter=...>`), `|items`, macros,
  loop.previtem/nextitem, and a generation prompt that opens `<think>` as Qwen3.5 does.
- MIXTRAL: `[INST]` turns with bos/eos tokens and raise_exception on bad role order.
- LLAMA_TOOLS: strftime_now, tojson with indent/sort_keys/separators, loop controls, {% generation %}.
- HARMONY: gpt-oss's harmony format (system and developer messages, tools as a TypeScript namespace,
  analysis/final channels, calls `to=functions.NAME` ended by <|call|>, results from `functions.NAME`).
- MINIMAX_M2: MiniMax-M2's `]~b]role` turns, <think> kept only after the last user message, tools as JSON in
  <tools>, calls in <minimax:tool_call> invoke blocks, and a generation prompt that opens <think>.
"""

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

QWEN35_XML = r"""{%- macro render_extra_keys(json_dict, handled_keys) %}
    {%- if json_dict is mapping %}
        {%- for json_key in json_dict if json_key not in handled_keys %}
            {%- if json_dict[json_key] is mapping or (json_dict[json_key] is sequence and json_dict[json_key] is not string) %}
                {{- '\n<' ~ json_key ~ '>' ~ (json_dict[json_key] | tojson | safe) ~ '</' ~ json_key ~ '>' }}
            {%- else %}
                {{-'\n<' ~ json_key ~ '>' ~ (json_dict[json_key] | string) ~ '</' ~ json_key ~ '>' }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined or tools is none %}
    {%- set tools = [] %}
{%- endif %}
{%- if system_message is defined %}
    {{- "<|im_start|>system\n" + system_message }}
{%- elif tools | length > 0 %}
    {{- "<|im_start|>system\nYou are a helpful assistant that can call tools." }}
{%- endif %}
{%- if tools | length > 0 %}
    {{- "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {%- if tool.function is defined %}
            {%- set tool = tool.function %}
        {%- endif %}
        {{- "\n<function>\n<name>" ~ tool.name ~ "</name>" }}
        {{- '\n<description>' ~ (tool.description | trim) ~ '</description>' }}
        {{- '\n<parameters>' }}
        {%- for param_name, param_fields in tool.parameters.properties|items %}
            {{- '\n<parameter>\n<name>' ~ param_name ~ '</name>' }}
            {%- if param_fields.type is defined %}
                {{- '\n<type>' ~ (param_fields.type | string) ~ '</type>' }}
            {%- endif %}
            {{- render_extra_keys(param_fields, ['name', 'type', 'description']) }}
            {{- '\n</parameter>' }}
        {%- endfor %}
        {{- '\n</parameters>\n</function>' }}
    {%- endfor %}
    {{- "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>" }}
{%- endif %}
{%- if system_message is defined or tools | length > 0 %}
    {{- '<|im_end|>\n' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role == "assistant" and message.tool_calls is defined and message.tool_calls | length > 0 %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content is defined and message.content is string and message.content | trim | length > 0 %}
            {{- '\n' + message.content | trim + '\n' }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
            {%- for args_name, args_value in tool_call.arguments|items %}
                {{- '<parameter=' + args_name + '>\n' }}
                {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                {{- args_value }}
                {{- '\n</parameter>\n' }}
            {%- endfor %}
            {{- '</function>\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user\n' }}
        {%- endif %}
        {{- '<tool_response>\n' + message.content + '\n</tool_response>\n' }}
        {%- if loop.last or loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}"""

MIXTRAL = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

LLAMA_TOOLS = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
<|im_start|>system
Today Date: {{ date_string }}
{% if tools is not none %}
{% for t in tools %}
{% if t.function.name == 'skip_me' %}{% continue %}{% endif %}
{{ t | tojson(indent=4, sort_keys=True) }}
{{ t.function.parameters | tojson(separators=(',', ':')) }}
{% endfor %}
{% endif %}
<|im_end|>
{% for m in messages %}
    {% if loop.index0 >= max_turns | default(100) %}{% break %}{% endif %}
    <|im_start|>{{ m.role }}
    {% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}

    {% if m.reasoning_content is defined %}[{{ m.reasoning_content }}]{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

HARMONY = r"""{%- macro ts_type(spec) -%}
{%- if spec.type in ("integer", "number") -%}number{%- elif spec.type in ("string", "boolean") -%}{{ spec.type }}{%- else -%}any{%- endif -%}
{%- endmacro -%}
{{- "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n\n" }}
{{- "Reasoning: " + (reasoning_effort | default("medium")) + "\n\n" }}
{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
{%- if tools %}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." }}{%- endif %}
{{- "<|end|>" }}
{%- if messages[0].role in ("developer", "system") %}
    {%- set developer_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if developer_message or tools %}
    {{- "<|start|>developer<|message|>" }}
    {%- if developer_message %}{{- "# Instructions\n\n" + developer_message + "\n\n" }}{%- endif %}
    {%- if tools %}
        {{- "# Tools\n\n## functions\n\nnamespace functions {\n\n" }}
        {%- for tool in tools %}
            {{- "// " + tool.function.description + "\ntype " + tool.function.name + " = (_: {\n" }}
            {%- for name, spec in tool.function.parameters.properties.items() %}
                {{- name + "?: " + ts_type(spec) + ",\n" }}
            {%- endfor %}
            {{- "}) => any;\n\n" }}
        {%- endfor %}
        {{- "} // namespace functions" }}
    {%- endif %}
    {{- "<|end|>" }}
{%- endif %}
{%- set last_tool = namespace(name=none) %}
{%- for message in loop_messages %}
    {%- if message.role == "assistant" and message.tool_calls %}
        {%- set later = namespace(final=false) %}
        {%- for m in loop_messages[loop.index:] %}
            {%- if m.role == "assistant" and not m.tool_calls %}{%- set later.final = true %}{%- endif %}
        {%- endfor %}
        {%- if message.thinking and not later.final %}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- "<|start|>assistant to=functions." + call.name + "<|channel|>commentary json<|message|>" }}
        {{- call.arguments | tojson + "<|call|>" }}
        {%- set last_tool.name = call.name %}
    {%- elif message.role == "assistant" %}
        {%- if loop.last and not add_generation_prompt and message.thinking %}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
        {%- endif %}
        {{- "<|start|>assistant<|channel|>final<|message|>" + message.content }}
        {{- "<|return|>" if loop.last and not add_generation_prompt else "<|end|>" }}
    {%- elif message.role == "tool" %}
        {%- if last_tool.name is none %}{{- raise_exception("a tool message needs an earlier tool call") }}{%- endif %}
        {{- "<|start|>functions." + last_tool.name + " to=assistant<|channel|>commentary<|message|>" }}
        {{- message.content | tojson + "<|end|>" }}
    {%- elif message.role == "user" %}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|start|>assistant" }}{%- endif %}"""

MINIMAX_M2 = r"""{%- set conversation = messages[1:] if messages[0].role == "system" else messages %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in conversation %}{%- if m.role == "user" %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{{- "]~!b[]~b]system\n" + (messages[0].content if messages[0].role == "system" else "You are a helpful assistant.") }}
{%- if tools %}
    {{- "\n\n# Tools\nYou may call one or more tools to assist with the user query.\n" }}
    {{- "Here are the tools available in JSONSchema format:\n\n<tools>\n" }}
    {%- for tool in tools %}{{- "<tool>" + tool.function | tojson + "</tool>\n" }}{%- endfor %}
    {{- "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n" }}
    {{- "<minimax:tool_call>\n<invoke name=\"tool-name-1\">\n<parameter name=\"param-key-1\">param-value-1</parameter>\n" }}
    {{- "</invoke>\n</minimax:tool_call>" }}
{%- endif %}
{{- "[e~[\n" }}
{%- for m in conversation %}
    {%- if m.role == "assistant" %}
        {{- "]~b]ai\n" }}
        {%- if m.reasoning_content and loop.index0 > ns.last_user %}
            {{- "<think>\n" + m.reasoning_content + "\n</think>\n\n" }}
        {%- endif %}
        {{- m.content or "" }}
        {%- if m.tool_calls %}
            {{- "\n<minimax:tool_call>\n" }}
            {%- for tc in m.tool_calls %}
                {{- "<invoke name=\"" + tc.function.name + "\">\n" }}
                {%- for k, v in tc.function.arguments | items %}
                    {{- "<parameter name=\"" + k + "\">" + (v if v is string else v | tojson) + "</parameter>\n" }}
                {%- endfor %}
                {{- "</invoke>\n" }}
            {%- endfor %}
            {{- "</minimax:tool_call>" }}
        {%- endif %}
        {{- "[e~[\n" }}
    {%- elif m.role == "tool" %}
        {%- if loop.first or conversation[loop.index0 - 1].role != "tool" %}{{- "]~b]tool" }}{%- endif %}
        {{- "\n<response>" + m.content + "</response>" }}
        {%- if loop.last or conversation[loop.index0 + 1].role != "tool" %}{{- "[e~[\n" }}{%- endif %}
    {%- elif m.role == "user" %}
        {{- "]~b]user\n" + m.content + "[e~[\n" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "]~b]ai\n<think>\n" }}{%- endif %}"""

TEMPLATES = {"qwen3": QWEN3, "qwen35_xml": QWEN35_XML, "mixtral": MIXTRAL, "llama_tools": LLAMA_TOOLS}
