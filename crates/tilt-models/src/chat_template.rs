//! Chat templates: the Jinja template a model ships (`tokenizer.chat_template` in GGUF
//! metadata) rendered with `minijinja`.
//!
//! Templates are written for Python's Jinja2 and call Python string methods
//! (`.strip()`, `.startswith()` …); minijinja-contrib's `pycompat` callback supplies those,
//! and `raise_exception` is provided as templates from `transformers` expect. The variables
//! are those `transformers`' `apply_chat_template` passes: `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`. The end-to-end test compares the
//! rendered text with `transformers`' for SmolLM2.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::ModelError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compile `source` (Jinja); `bos_token`/`eos_token` are the strings the template may
    /// refer to.
    ///
    /// # Errors
    /// [`ModelError::ChatTemplate`] when the template does not parse.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ModelError::ChatTemplate(format!("cannot parse the template: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Render `messages`, followed by the assistant's turn opener when
    /// `add_generation_prompt` is set.
    ///
    /// # Errors
    /// [`ModelError::ChatTemplate`] when rendering fails (including the template's own
    /// `raise_exception`).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ModelError::Internal(format!("chat template lost: {e}")))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| ModelError::ChatTemplate(format!("cannot render: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_and_without_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let m = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&m, false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() }}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  x ")], false)
                .unwrap(),
            "x</s>"
        );
        let err = t
            .render(&[ChatMessage::new("system", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn malformed_template_is_a_clear_error() {
        let err = ChatTemplate::new("{% for x in %}", "", "").unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err}");
    }
}
