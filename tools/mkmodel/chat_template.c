/* chat_template.c — the Qwen2.5-VL chat template the packages' tokenizer_config.json carries,
 * as bytes of the binary: chat_template.jinja, which tools/train/tokenizer.py reads too, so
 * that the template is written once. The assembler reads the file at build time (the
 * Makefile names it as this object's prerequisite); a NUL ends it. */
#include "mkmodel.h"

__asm__(".section .rodata\n"
        ".global mk_chat_template\n"
        ".type mk_chat_template, @object\n"
        "mk_chat_template:\n"
        ".incbin \"tools/mkmodel/chat_template.jinja\"\n"
        ".byte 0\n"
        ".size mk_chat_template, . - mk_chat_template\n"
        ".previous\n");
