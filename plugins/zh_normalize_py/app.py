"""zh_normalize: a pt-host mapper written in Python (componentize-py).

Converts traditional Chinese characters to simplified ones (the common
characters of medical and general text; see TRADITIONAL below), CJK corner
quotes to curly quotes, and runs of repeated CJK punctuation to one mark.
Documents it does not change come back as `unchanged`.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import Document, Edit_Replace, Edit_Unchanged, Info, Kind

# Traditional -> simplified, one character each (common characters of
# medical and general text; not a full OpenCC table).
TRADITIONAL = (
    "醫医 藥药 療疗 診诊 斷断 癥症 發发 熱热 傳传 染染 滅灭 應应 當当 時时 檢检 查查 "
    "體体 溫温 頭头 痛痛 腦脑 膽胆 腸肠 臟脏 膚肤 髮发 齒齿 嚨咙 喉喉 脈脉 膿脓 瘡疮 "
    "瘧疟 癆痨 癢痒 癒愈 瘻瘘 腫肿 殘残 壞坏 傷伤 創创 護护 顯显 微微 鏡镜 驗验 測测 "
    "劑剂 價价 鹼碱 鐵铁 鈣钙 鈉钠 鉀钾 鋅锌 氣气 過过 對对 與与 從从 們们 個个 這这 "
    "樣样 說说 話话 語语 讀读 書书 學学 習习 問问 題题 門门 開开 關关 間间 聽听 見见 "
    "觀观 視视 親亲 覺觉 現现 實实 際际 進进 還还 邊边 遠远 運运 動动 勞劳 務务 務务 "
    "為为 無无 來来 東东 車车 長长 馬马 鳥鸟 魚鱼 龍龙 國国 園园 圖图 團团 會会 後后 "
    "經经 給给 結结 統统 絕绝 續续 織织 組组 細细 紅红 綠绿 線线 練练 總总 級级 約约 "
    "雖虽 雙双 難难 離离 電电 靈灵 風风 飛飞 飯饭 飲饮 養养 餘余 機机 構构 標标 樹树 "
    "歲岁 歷历 氣气 漢汉 濕湿 滿满 燒烧 營营 爭争 狀状 獨独 環环 產产 畫画 異异 當当 "
    "積积 稱称 種种 穩稳 窮穷 競竞 筆笔 節节 範范 簡简 類类 糧粮 術术 衛卫 衝冲 補补 "
    "製制 複复 規规 計计 記记 許许 論论 設设 診诊 該该 認认 調调 請请 議议 護护 變变 "
    "財财 負负 質质 購购 費费 資资 賽赛 趨趋 輕轻 輸输 農农 邊边 鄉乡 鬥斗 麼么 黃黄 "
    "齊齐 腎肾 膠胶 臨临 興兴 舊旧 蘭兰 處处 蟲虫 蠶蚕 裡里 複复 覆复 證证 讓让 貓猫"
)
TABLE = {pair[0]: pair[1] for pair in TRADITIONAL.split()}
QUOTES = {"「": "“", "」": "”", "『": "‘", "』": "’"}
PUNCTUATION = set("。，、；：！？…")

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "zh_normalize configuration",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "convert_traditional": {"type": "boolean", "default": True},
        "normalize_quotes": {"type": "boolean", "default": True},
        "collapse_punctuation": {"type": "boolean", "default": True},
    },
}

config = {"convert_traditional": True, "normalize_quotes": True, "collapse_punctuation": True}


def normalize(text: str) -> str:
    out = []
    for ch in text:
        if config["convert_traditional"]:
            ch = TABLE.get(ch, ch)
        if config["normalize_quotes"]:
            ch = QUOTES.get(ch, ch)
        if config["collapse_punctuation"] and ch in PUNCTUATION and out and out[-1] == ch and ch != "…":
            continue
        out.append(ch)
    return "".join(out)


class Plugin(exports.Plugin):
    def describe(self) -> Info:
        return Info(
            id="zh_normalize",
            version="0.1.0",
            description="Traditional to simplified Chinese, corner quotes to curly quotes, repeated CJK punctuation collapsed (Python)",
            kinds=[Kind.MAPPER],
            config_schema=json.dumps(SCHEMA),
        )

    def configure(self, text: str) -> None:
        try:
            given = json.loads(text)
        except ValueError as e:
            raise Err(f"configuration is not JSON: {e}")
        if not isinstance(given, dict):
            raise Err("configuration must be a JSON object")
        for key, value in given.items():
            if key not in config:
                raise Err(f"unknown key `{key}` (known: {', '.join(sorted(config))})")
            if not isinstance(value, bool):
                raise Err(f"`{key}` must be true or false")
            config[key] = value


class Mapper(exports.Mapper):
    def map_batch(self, docs: list[Document]) -> list:
        edits = []
        for doc in docs:
            text = normalize(doc.text)
            edits.append(Edit_Unchanged() if text == doc.text else Edit_Replace(text))
        return edits
