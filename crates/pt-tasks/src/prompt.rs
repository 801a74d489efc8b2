//! The prompts lm-evaluation-harness asks multiple-choice questions with,
//! to the character, so that accuracies compare with its numbers.

use crate::read::{Language, Question};

/// The choice letters' continuations: ` A`, ` B`, … after `Answer:`;
/// `A`, `B`, … after `答案：`.
pub fn continuations(language: Language, choices: usize) -> Vec<String> {
    (0..choices)
        .map(|i| {
            let letter = (b'A' + i as u8) as char;
            match language {
                Language::English => format!(" {letter}"),
                Language::Chinese => letter.to_string(),
            }
        })
        .collect()
}

/// The header, `shots` answered, then `question` up to its answer. The
/// subject is written with `_` as spaces; questions are trimmed.
pub fn context(
    language: Language,
    subject: &str,
    shots: &[Question],
    question: &Question,
) -> String {
    let subject = subject.replace('_', " ");
    let mut text = match language {
        Language::English => {
            format!(
                "The following are multiple choice questions (with answers) about {subject}.\n\n"
            )
        }
        Language::Chinese => {
            format!("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n")
        }
    };
    let answer_cue = match language {
        Language::English => "Answer:",
        Language::Chinese => "答案：",
    };
    let ask = |text: &mut String, question: &Question| {
        text.push_str(question.question.trim());
        for (i, choice) in question.choices.iter().enumerate() {
            text.push_str(&format!("\n{}. {choice}", (b'A' + i as u8) as char));
        }
        text.push('\n');
        text.push_str(answer_cue);
    };
    for shot in shots {
        ask(&mut text, shot);
        text.push_str(&continuations(language, shot.choices.len())[shot.answer]);
        text.push_str("\n\n");
    }
    ask(&mut text, question);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question(text: &str, answer: usize) -> Question {
        Question {
            source: "t.csv:2".into(),
            question: text.into(),
            choices: vec!["1".into(), "2".into(), "3".into(), "4".into()],
            answer,
        }
    }

    /// The harness's MMLU and C-Eval layouts, written out by hand.
    #[test]
    fn prompts_follow_the_harness_templates() {
        let shot = question(" 1+1? ", 1);
        let asked = question("2+2?", 3);
        assert_eq!(
            context(
                Language::English,
                "high_school_math",
                std::slice::from_ref(&shot),
                &asked
            ),
            "The following are multiple choice questions (with answers) about high school math.\n\n\
             1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n\
             2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
        );
        assert_eq!(
            context(Language::Chinese, "数学", &[shot], &asked),
            "以下是中国关于数学考试的单项选择题，请选出其中的正确答案。\n\n\
             1+1?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n\
             2+2?\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
        );
        assert_eq!(
            continuations(Language::English, 4),
            [" A", " B", " C", " D"]
        );
        assert_eq!(continuations(Language::Chinese, 2), ["A", "B"]);
    }
}
