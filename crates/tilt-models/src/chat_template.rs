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

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The user's turn.
    User,
    /// The assistant's turn (an earlier answer, or a prefix to continue).
    Assistant,
}

impl Role {
    /// `system`, `user` or `assistant`: the string a chat template sees.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One chat message. As JSON: `{"role": "user", "content": "…"}`; any other field, or a
/// role other than `system`, `user` and `assistant`, is refused when it is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
}

/// How a model without a chat template renders a chat: a single user message is its own
/// text; anything else is refused, since there is no template to say how turns are joined.
///
/// # Errors
/// [`ModelError::ChatTemplate`] naming `model` for anything but one user message.
pub fn render_without_template(
    model: &str,
    messages: &[ChatMessage],
) -> Result<String, ModelError> {
    match messages {
        [m] if m.role == Role::User => Ok(m.content.clone()),
        _ => Err(ModelError::ChatTemplate(format!(
            "{model} has no chat template, so only a single user message can be rendered \
             (got {} messages: {}); give the text as a raw prompt instead",
            messages.len(),
            messages
                .iter()
                .map(|m| m.role.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
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
        let m = [ChatMessage::user("Hi")];
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
            t.render(&[ChatMessage::user("  x ")], false).unwrap(),
            "x</s>"
        );
        let err = t
            .render(&[ChatMessage::new(Role::System, "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn roles_are_checked_when_read() {
        let m: ChatMessage = serde_json::from_str(r#"{"role":"assistant","content":"x"}"#).unwrap();
        assert_eq!(m, ChatMessage::new(Role::Assistant, "x"));
        assert!(serde_json::from_str::<ChatMessage>(r#"{"role":"bot","content":"x"}"#).is_err());
        assert!(
            serde_json::from_str::<ChatMessage>(r#"{"role":"user","content":"x","name":"a"}"#)
                .is_err()
        );
        // The template sees the role as its string.
        let t = ChatTemplate::new("{{ messages[0]['role'] }}", "", "").unwrap();
        assert_eq!(t.render(&[m], false).unwrap(), "assistant");
    }

    #[test]
    fn malformed_template_is_a_clear_error() {
        let err = ChatTemplate::new("{% for x in %}", "", "").unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err}");
    }
}
