# The Lark grammars of peftdsl, shipped inside the wheel as `peftdsl.grammar`.
